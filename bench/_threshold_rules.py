"""Whether the threshold rule or the network stands in the way of the serving benchmark's
goal: from the trainer's confidences and the measured cost of leaving at each exit, the least
time within 0.5 points of the full network that one threshold, or a threshold per exit chosen
with hindsight, could reach."""

from __future__ import annotations

import torch

RULE_GRID = torch.arange(0.3, 1.0, 0.025)  # thresholds the rules choose from


def threshold_rules(
    confidence: torch.Tensor,
    correct: torch.Tensor,
    exit_costs: torch.Tensor,
    grid: torch.Tensor = RULE_GRID,
) -> None:
    """Whether the rule or the network stands in the way: the least time within 0.5 points
    of the full network on the test images (`confidence`, `correct`: [K, N], the trainer's),
    predicted as the shares leaving at each exit times `exit_costs` (the time of leaving at
    each exit against the full network), for one threshold at every exit and for a threshold
    per exit chosen with hindsight on these images, each from `grid`. Up to the grid's step,
    the second bounds every rule that ranks an exit's images by its max softmax, calibrated
    per exit (temperature scaling) or not."""
    share, accuracy = leaving_shares(confidence, correct, grid)  # [G, .., G, K], [G, .., G]
    too_low = accuracy < correct[-1].float().mean() - 0.005
    cost = (share @ exit_costs).masked_fill(too_low, float("inf"))
    same = (torch.arange(len(grid)),) * cost.dim()  # the diagonal: one threshold everywhere
    rules = {
        "one threshold": (same[0][cost[same].argmin()],) * cost.dim(),
        "a threshold per exit": torch.unravel_index(cost.argmin(), cost.shape),
    }
    print(
        "\nthreshold rules, with hindsight on the test images: the least time within 0.5 points"
        " of the full network,\npredicted as the shares leaving at each exit times the costs"
        " of leaving there (above)"
    )
    for rule, best in rules.items():
        if cost[best].isinf():
            print(f"  {rule:>20}: none within 0.5 points")
            continue
        print(
            f"  {rule:>20}: {', '.join(f'{grid[i]:.3g}' for i in best)} -> {cost[best]:.3f} of"
            f" the full network's time ({1 / cost[best]:.2f}x), shares leaving at each exit "
            + " ".join(f"{x:.2f}" for x in share[best].tolist())
        )


def leaving_shares(
    confidence: torch.Tensor, correct: torch.Tensor, grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every choice of a threshold from `grid` at each of exits 1..K-1 (the last exit
    takes everyone left): the share of the images leaving at each exit, [G, .., G, K], and
    the accuracy, [G, .., G]."""
    exits, images = confidence.shape
    alive = torch.ones(images, dtype=torch.bool)
    leaving, hits = [], torch.zeros(())
    for k in range(exits):
        if k < exits - 1:  # a new axis for this exit's threshold
            shape = [1] * (exits - 1) + [images]
            shape[k] = len(grid)
            leave = alive & (confidence[k] >= grid.view(-1, 1)).view(shape)
            alive = alive & ~leave
        else:
            leave = alive
        leaving.append(leave.sum(dim=-1))
        hits = hits + (leave & correct[k]).sum(dim=-1)
    share = torch.stack(torch.broadcast_tensors(*leaving), dim=-1) / images
    return share, hits / images
