"""One module per model family, each implementing :class:`clipcli.models.LoadedModel`."""
