"""snapshot subpackage of twisted_postcopy."""
