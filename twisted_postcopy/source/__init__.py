"""source subpackage of twisted_postcopy."""
