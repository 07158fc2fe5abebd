"""The main job, `nemotron3 run` and `./run.sh`: the whole recipe on the embedded default, and its report.

    from nemotron3.run import RunConfig, run
    report = run(RunConfig())              # == `nemotron3 run`: runs/latest/report.{md,html,json}

  plan.py      the budget rule: minutes -> each stage's size
  stages.py    the stages, one function each, one folder each
  measure.py   the inference measurements (MTP speculation, the engine against transformers)
  report.py    report.json, report.md and report.html, from the stages' summaries
  plots.py     the report's plots (matplotlib)
  document.py  the report's headings, paragraphs, tables and images, as Markdown and as one HTML page
  pipeline.py  RunConfig, run(): order, skipping and resuming, one progress display
"""

from nemotron3.run.pipeline import RunConfig, main, run

__all__ = ["RunConfig", "run", "main"]
