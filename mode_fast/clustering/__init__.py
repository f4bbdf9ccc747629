"""MoDE's clustering: k-means, the two levels (fine centers grouped into coarse experts),
caption embedders and the cluster folder.
"""
