"""Applications built on the algorithm: photo cloaking (and, later, the command line, demo and benchmark)."""
