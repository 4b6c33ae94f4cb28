"""Training and prompt data: reading and checking rows, chat templates, image and audio parts."""
