"""One-command experiments that test the seeds' claims: k-hop extrapolation, loop scaling, dense vs looped."""
