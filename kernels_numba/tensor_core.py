"""placeholder during development"""
def reasons(pr):
    return ["not yet"]
