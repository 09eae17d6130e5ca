"""Entry points a person runs: the end-to-end driver and the chat front end."""
