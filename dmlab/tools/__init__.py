"""Command-line tools: ``python -m dmlab.tools.book`` (execute every chapter, build the book),
``python -m dmlab.tools.test`` (what CI runs), ``python -m dmlab.tools.notebooks`` (make and check chapters)."""
