"""The command-line jobs (`mode-fast <job>`): each builds its parser and runs its stage.
Only mode_fast.cli imports this package.
"""
