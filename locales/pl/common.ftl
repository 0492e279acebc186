default-name = przyjacielu
common-fallback = Przepraszam, nie zrozumiałem. Wyślij /start, aby znowu zobaczyć menu.
