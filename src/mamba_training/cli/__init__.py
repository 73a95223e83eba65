"""The command line: parsing and printing only."""

# Set by a command whose results are all written and closed when it returns (`train`): the console
# entry point then ends the process without interpreter teardown, which with torch loaded costs
# about a second on every run and every resumed spot segment.
skip_teardown = False
