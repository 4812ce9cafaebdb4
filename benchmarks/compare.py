"""The comparison suite (see funceng.bench): the same job through PyTorch loops, MMEngine, Lightning and funceng.

    python benchmarks/compare.py [--quick] [--workloads mlp cnn resnet18 gpt] [--json out.json]
    funceng bench ...                                   (the same)
"""

from funceng.bench import main

if __name__ == "__main__":
    main()
