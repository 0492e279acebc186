default-name = there
common-fallback = Sorry, I did not get that. Send /start to see the menu again.
handoff-waiting = Thanks! A member of our team will answer you here soon.
