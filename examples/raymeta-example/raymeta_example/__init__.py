"""An example raymeta plugin: a meta method, a model and a noise model in a package of its own
(docs/extending.md)."""
