"""The tools' command lines: each module is one `mgmlora <command>`, a typed settings dataclass and its `main`.

`mgmlora.__main__` dispatches to them; `bin/*.py` are thin wrappers for a checkout. Docs: docs/design/architecture.md
(the settings pipeline, and the steps to add a tool).
"""

COMMANDS = {  # command name -> module under mgmlora.commands (imported only when run)
    "export": "export",
    "generate": "generate",
    "score": "score",
    "compare": "compare",
    "estimate": "estimate",
    "sample-chameleons": "sample_chameleons",
    "show-samples": "show_samples",
}

__all__ = ["COMMANDS"]
