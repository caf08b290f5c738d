"""TrAct experiments (Petersen, Borgelt, Ermon, NeurIPS 2024): ResNet-18 and ViT on CIFAR.

``python -m experiments.tract.train_cifar`` trains one run; ``python -m experiments.tract.plot``
(or ``train_cifar --compare``) draws several runs side by side. See docs/tract_experiments.md.
"""
