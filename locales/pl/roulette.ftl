roulette-intro = Zakręć kołem i wygraj zniżkę! Masz 3 obroty.
roulette-btn-spin = Kręć!
roulette-btn-again = Jeszcze raz
roulette-btn-claim = Odbierz kod
roulette-prize-10 = 10% zniżki
roulette-prize-25 = 25% zniżki
roulette-prize-shipping = darmową dostawę
roulette-prize-nothing = tym razem nic
roulette-won = Wygrywasz { $prize_label }! Kliknij przycisk, aby odebrać kod.
roulette-code = Twój kod: { $prize_code }. Użyj go przy zamówieniu.
roulette-lost = Tym razem się nie udało. Spróbuj jeszcze raz!
roulette-no-spins = Wykorzystano wszystkie obroty. Zaproś znajomego, by dostać kolejny: https://t.me/ExampleShopBot?start={ $referral_ref }
roulette-out = Niestety nagrody się skończyły. Dziękujemy za grę!
