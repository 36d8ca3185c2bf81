"""Command-line interface ``homflow`` (typer + rich)."""

from __future__ import annotations

import typer

app = typer.Typer(help="homflow: gradient-flow laboratory for homogeneous neural networks.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Exact gradient flows, certified KKT points, neuron splitting and the phases of small-initialisation training."""


@app.command()
def demo(quick: bool = typer.Option(False, "--quick", help="Smaller sizes for a fast check.")) -> None:
    """Run one exact gradient flow of a two-layer ReLU^2 network from a tiny initialisation and print its figures."""
    import jax
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from . import enable_x64
    from .activations import relu_power
    from .data import teacher_student
    from .flow import gradient_flow
    from .models import TwoLayer

    enable_x64()
    console = Console()
    data = teacher_student(100, 10, teacher_width=5, p=2, seed=0)
    model = TwoLayer(10, 50, relu_power(2), key=jax.random.PRNGKey(0), scale=1e-3)
    t1 = 80.0 if quick else 150.0
    with console.status(f"integrating the gradient flow to t = {t1:g} (Tsit5, rtol 1e-8, float64)"):
        tr = gradient_flow(model, data, loss="square", t1=t1, rtol=1e-8)
    table = Table(title="gradient flow, two-layer ReLU^2, width 50, square loss, delta = 1e-3")
    for col in ("t", "loss", "||theta||"):
        table.add_column(col, justify="right")
    for i in np.unique(np.linspace(0, len(tr.ts) - 1, 12).astype(int)):
        table.add_row(f"{tr.ts[i]:.4g}", f"{tr.loss[i]:.6g}", f"{tr.norm[i]:.4g}")
    console.print(table)
    console.print(f"{tr.result.reason}; {tr.stats['num_steps']} steps, {tr.stats['grad_evals']} gradient evaluations")


if __name__ == "__main__":  # pragma: no cover
    app()
