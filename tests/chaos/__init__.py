"""The chaos run: a night of real clawq processes on a private AOF Redis, with kills, a restart and an outage."""
