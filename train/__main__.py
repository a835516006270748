"""Default job (interim, until the full harness lands): Drainage vs cross-entropy on scikit-learn's
bundled digits (1,797 real 8x8 images, no download) with 40% asymmetric label noise, on the CPU.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from drainage_fast import fused_drainage_loss

FLIPS = {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}  # the MNIST asymmetric map (source -> noisy label)


def noisy_labels(y: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    noisy = y.clone()
    for src, dst in FLIPS.items():
        idx = (y == src).nonzero().flatten()
        flip = idx[torch.randperm(len(idx), generator=gen)[: int(rate * len(idx))]]
        noisy[flip] = dst
    return noisy


def train(loss_name: str, x, y_noisy, x_test, y_test, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    outputs = 11 if loss_name == "drainage" else 10
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, outputs))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        for batch in torch.randperm(len(x)).split(128):
            logits = model(x[batch])
            if loss_name == "drainage":
                loss = fused_drainage_loss(logits, y_noisy[batch], alpha=1.0)
            else:
                loss = F.cross_entropy(logits, y_noisy[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = model(x_test)
        acc = (logits[:, :10].argmax(1) == y_test).float().mean().item()
        drained = (logits.argmax(1) == 10).float().mean().item() if outputs == 11 else 0.0
    return acc, drained


def main() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=gen)
    train_idx, test_idx = perm[:1400], perm[1400:]
    y_noisy = noisy_labels(y[train_idx], 0.4, gen)
    print(f"digits: {len(train_idx)} train / {len(test_idx)} test, "
          f"{(y_noisy != y[train_idx]).float().mean():.1%} of training labels flipped (asymmetric)")
    print(f"{'loss':>10} | clean test acc | drained (test)")
    for name in ("ce", "drainage"):
        acc, drained = train(name, x[train_idx], y_noisy, x[test_idx], y[test_idx], seed=0)
        print(f"{name:>10} | {acc:14.1%} | {drained:13.1%}")


if __name__ == "__main__":
    main()
