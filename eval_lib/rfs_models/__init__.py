"""The network a genotype is trained as (the paper repository keeps it with RFS's models).

Modules:
    augment_cnn  AugmentCNN, the evaluation network
    complexity   parameters, MACs (ptflops) and Conv/Linear MACs (as TE-NAS counts them)
"""
