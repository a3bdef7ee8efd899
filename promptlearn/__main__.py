from promptlearn.commands import entry

entry()
