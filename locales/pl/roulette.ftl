roulette-intro = Zakręć kołem i wygraj zniżkę! { $spins_left ->
    [0] Nie masz już obrotów.
    [one] Masz 1 obrót.
    [few] Masz { $spins_left } obroty.
    [many] Masz { $spins_left } obrotów.
   *[other] Masz { $spins_left } obrotu.
}
roulette-btn-spin = Kręć!
roulette-btn-again = Jeszcze raz
roulette-btn-claim = Odbierz kod
roulette-prize-10 = 10% zniżki
roulette-prize-25 = 25% zniżki
roulette-prize-shipping = darmową dostawę
roulette-prize-nothing = tym razem nic
roulette-won = Wygrywasz { $prize_label }! Kliknij przycisk, aby odebrać kod.
roulette-code = Twój kod: { $prize_code }. Użyj go przy zamówieniu.
roulette-already-won = Masz już nagrodę: { $prize_label }. Twój kod: { $prize_code }. Jedna nagroda na klienta — dziękujemy za grę!
roulette-lost = Tym razem się nie udało. Spróbuj jeszcze raz!
roulette-no-spins = Wykorzystano wszystkie obroty. Zaproś znajomego, by dostać kolejny: https://t.me/ExampleShopBot?start={ $referral_ref }
roulette-out = Niestety nagrody się skończyły. Dziękujemy za grę!
