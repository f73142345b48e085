"""`python -m flexgen_lite.eval ARGS`: lm-eval's own command line (`lm_eval ARGS`) with the model "flexgen-lite"
registered (lm-eval 0.4 finds models by import, not by entry point):

    python -m flexgen_lite.eval --model flexgen-lite --model_args pretrained=PATH,policy=auto --tasks hellaswag
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_model  # noqa: F401  (registers "flexgen-lite")

    cli_evaluate()


if __name__ == "__main__":
    main()
