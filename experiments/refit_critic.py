"""Fresh critics fitted to a run's frozen policy, beside its trained critics.

    python -m experiments.refit_critic run_dir=runs/CarGoal1/seed0
    python -m experiments.refit_critic run_dir=<run> episodes=100 updates=50000 out=refit.json

Tells where a trained critic's bias comes from (`cvpo_jax.critic_refit`): a TD critic
fitted by the training's own update on the frozen policy's data (``td``) and a
regression on the realised to-go (``mc``), all compared on held-out episodes.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.cli import UsageError, _unknown, run_cli, to_dict

KEYS = {
    "run_dir",
    "step",
    "episodes",
    "eval_episodes",
    "updates",
    "batch_size",
    "seed",
    "env",
    "action_repeat",
    "out",
}


def _main(cfg: DictConfig) -> int:
    from cvpo_jax.critic_refit import refit_report
    from cvpo_jax.evaluation import write_result

    data = to_dict(cfg)
    _unknown(data, KEYS, "refit_critic")
    if not data.get("run_dir"):
        raise UsageError("no run given: pass run_dir=<a host run with a checkpoint>.")
    run_dir = Path(str(data["run_dir"])).expanduser()
    report = refit_report(
        run_dir,
        step=data["step"],
        episodes=data["episodes"],
        eval_episodes=data["eval_episodes"],
        updates=data["updates"],
        batch_size=data["batch_size"],
        seed=data["seed"],
        env_id=data["env"],
        action_repeat=data["action_repeat"],
        log=lambda msg: print(f"[refit] {msg}", flush=True),
    )
    out = Path(data["out"] or run_dir / "eval" / f"refit_step{report['step']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, report)
    print(format_report(report))
    print(f"Written to {out}")
    return 0


def format_report(report: dict) -> str:
    """A markdown table: each critic's Q_c and Q_r bias / correlation on the held-out
    and the fitting episodes."""
    lines = [
        f"{report['env_id']} (k = {report['action_repeat']}), checkpoint at env step "
        f"{report['step']}; Q_c threshold {report['qc_threshold'][0]:.2f}",
        "",
        "| critic | data | Q_c bias | Q_c corr | realised Q_c "
        "| Q_r bias | Q_r corr | realised Q_r |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for part in ("held_out", "train"):
        for name, stats in report[part].items():
            c, r = stats["cost"][0], stats["reward"]
            lines.append(
                f"| {name} | {part} | {c['bias']:+.2f} | {c['corr']:.2f} | {c['mc']:.2f} "
                f"| {r['bias']:+.2f} | {r['corr']:.2f} | {r['mc']:.2f} |"
            )
    rates = ", ".join(
        f"{b['decisions'][0]}-{b['decisions'][1] - 1}: {b['cost'][0]:.3f}"
        for b in report["rates_by_decision"]
    )
    lines += ["", f"Cost per decision by decision index (fitting episodes): {rates}", ""]
    lines.append(
        "Q_c level on the fitting episodes (all rows): E[Q(s,a)] / E[Q(s',pi)] / mean TD "
        "error / E[c]/(1-gamma_c)"
    )
    for name, lv in report["level"].items():
        lines.append(
            f"  {name:8s} {lv['q']:7.2f} / {lv['next_q']:7.2f} / {lv['td_error']:+.3f} / "
            f"{lv['stationary']:.2f}"
        )
    return "\n".join(lines)


@hydra.main(version_base=None, config_path="conf", config_name="refit_critic")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: _main(cfg))


if __name__ == "__main__":
    main()
