"""Texts: NLI zero-shot text classification and text inputs."""
