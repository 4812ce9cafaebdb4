"""Per-step time of a plain eager torch.optim loop vs funceng eager vs funceng compiled (see funceng.bench).

    python benchmarks/step_overhead.py [--windows 15] [--steps 50]
"""

from funceng.bench import main

if __name__ == "__main__":
    main()
