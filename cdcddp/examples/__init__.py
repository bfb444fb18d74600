"""Example cdcddp applications (``cdcddp.examples.todos``: Meteor's Todos app)."""
