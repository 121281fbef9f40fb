"""Continual semantic segmentation (paper 002 Table 3) on the PLOP protocol (Douillard et al., CVPR 2021):

    tasks.py   PLOP's task dictionaries, its image filter (disjoint / overlap) and label maps (background shift)
    data.py    a step of any registered dataset (the filtered images, masks relabelled); per-image class sets cached
    plop.py    Local POD, entropy pseudo-labels, the classifier growth and PLOP's initialisation
    loop.py    one trial = one task sequence (trainers.loop dispatches here when continual.task is set)

Kept free of imports here: trainers.config validates continual.task through tasks.py.
"""
