"""The classic validator (`notsure attack`): the paper's FGSM, BIM, PGD and ILLC against the
service, and a report of what its NOT SURE filters (docs/attack/)."""
