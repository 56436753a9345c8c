"""The benchmark application of cusdpa: ``bench`` (``python -m cusdpa bench``) compares cusdpa with
PyTorch's SDPA backends; the scripts beside it tune tiles (``flash_sweep``), measure host cost per call
(``overhead``) and drive the lent GPU machine (``on_device.sh``). It imports cusdpa and interop; nothing
in them imports it."""
