default-name = there
common-fallback = Sorry, I did not get that. Send /start to see the menu again.
