"""Evaluation runs: labelled datasets, metrics, plots, image and text evaluation."""
