default-name = przyjacielu
common-fallback = Przepraszam, nie zrozumiałem. Wyślij /start, aby znowu zobaczyć menu.
handoff-waiting = Dziękujemy! Wkrótce odpowie Ci tutaj ktoś z naszego zespołu.
