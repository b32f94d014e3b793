"""destination subpackage of twisted_postcopy."""
