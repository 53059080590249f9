"""The attack algorithms, each registered by name (see `registry`): the paper's FGSM, BIM, PGD
and ILLC (`classic`), and the adaptive attacks that know the score and the served T (`pgd`,
`cw`, `apgd`, `square`, `targeted`), and `transfer`, which crafts images on one model for another.
Importing the package registers them all."""

from training.attacks import apgd, classic, cw, pgd, square, targeted, transfer
from training.attacks.registry import get, names, register

__all__ = [
    "apgd",
    "classic",
    "cw",
    "get",
    "names",
    "pgd",
    "register",
    "square",
    "targeted",
    "transfer",
]
