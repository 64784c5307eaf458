"""One module per model family, each implementing :class:`clipcli.models.contract.LoadedModel`."""
