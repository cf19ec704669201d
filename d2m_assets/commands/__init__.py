"""The `d2m` commands' bodies: run, filter and reshard, register, what they show, recovery, run overhead."""

LAUNCHES = ("warm", "new")  # how `d2m bench --stage run-overhead` launches its run (commands.overhead); here, light,
# for the CLI's choices
