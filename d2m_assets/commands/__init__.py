"""The `d2m` commands' bodies: run, filter and reshard, register, what they show, recovery, run overhead."""
