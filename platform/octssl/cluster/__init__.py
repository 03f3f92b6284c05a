"""Ray at the edges: start or join a cluster, submit and follow jobs, reap what a dead driver leaves."""
