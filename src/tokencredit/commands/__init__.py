"""The commands behind `tokencredit <name>`: each a config class and a run function."""
