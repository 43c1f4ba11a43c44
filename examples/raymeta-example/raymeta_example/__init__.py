"""An example raymeta plugin: a meta method and a model in a package of its own (docs/extending.md)."""
