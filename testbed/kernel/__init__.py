"""Kernel objects, one type per module, with the same verbs: create / delete / show."""
