"""Authoring and instructor tools: build notebooks, run them, grade submissions, report, benchmark. Lessons do not
import these."""
