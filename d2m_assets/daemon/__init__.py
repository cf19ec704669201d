"""What the daemon runs by itself: each dataset's sensors, schedules and automation conditions."""
