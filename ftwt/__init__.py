"""ftwt: dynamic channel pruning with self-supervised mask prediction.

Implements "Fire Together Wire Together: A Dynamic Pruning Approach with Self-Supervised
Mask Prediction" (Elkerdawy et al., CVPR 2022, arXiv 2110.08232) for any CNN.
"""
