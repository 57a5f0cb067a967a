"""Constants shared by every dataset: the paper's RGB normalisation."""
# the official code feeds RGB in 0-255 as (x - 114.75) / 57.375
MEAN = 114.75
STD = 57.375
