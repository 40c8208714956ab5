"""Reviewing runs (torch-free): tables, run-to-run comparison, the HTML/Markdown page and its plots."""
