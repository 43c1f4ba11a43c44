"""An example raymeta plugin: a meta method, a model, a dataset and a noise model in a package of
its own (docs/extending.md)."""
