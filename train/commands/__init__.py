"""The `python -m train` commands, one thin module each (train/cli.py dispatches to them): FLAGS (the
shared flags of train/cli.py it takes), add_arguments(parser) and main(args) -> exit status.

A command only consumes the library (train/*.py and its subpackages); it never imports another command:
what two commands share lives in the library (tests/train/test_layers.py checks this).
"""
