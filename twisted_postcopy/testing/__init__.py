"""testing subpackage of twisted_postcopy."""
